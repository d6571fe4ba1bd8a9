"""One module per variant; each defines its class and names it ``VARIANT``."""
