"""Scale benchmarks: the app at 1,000+ simulated nodes against a minimal Flower app."""
