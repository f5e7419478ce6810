"""The front door: the gRPC server clients connect to (TLS, tokens, limits, status codes, health,
reflection, drain). It runs inside each model replica and reaches the models through an Engine;
it imports no torch and no Ray."""
