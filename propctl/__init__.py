"""The propctl command line: a thin layer over ``reconciler``."""
