"""The departmental DNS sinkhole: resolver daemon, policy and command line."""
__version__ = "0.1.0"
