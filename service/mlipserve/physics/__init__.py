"""Physics corrections added at serving time on top of any backend: long-range electrostatics,
charge equilibration and dispersion. Pure torch/numpy: no grpc, protobuf or ray."""
