"""The Flower apps (ServerApp, ClientApp) and everything that runs inside them."""

from fl_common import keep_root_logger_quiet

keep_root_logger_quiet()  # before any module imports Opacus
