"""zsgd: distributed stochastic gradient descent over ZeroMQ, real and simulated."""

__version__ = "0.1.0"
