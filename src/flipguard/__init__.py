"""flipguard: reliability of neural networks under hardware bit flips."""

__version__ = "0.1.0"
