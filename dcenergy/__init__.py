"""dcenergy: GPU-fleet telemetry and energy optimization.

The shared core (schema, configuration, store, plan) lives in this package;
the node agent lives in ``agent`` and the central optimizer in ``optimizer``.
"""

__version__ = "0.1.0"
