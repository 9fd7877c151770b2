"""The Flower apps (ServerApp, ClientApp) and everything that runs inside them."""
