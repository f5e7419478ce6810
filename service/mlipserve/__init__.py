"""mlipserve: machine-learned interatomic potentials served by Ray Serve over gRPC."""

__version__ = "0.1.0"
