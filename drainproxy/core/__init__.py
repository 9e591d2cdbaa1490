"""Layer 3, core: the drain lifecycle state machine, the prober table and the counters. No
I/O: time comes from an injected clock, and callers read state through a ``Snapshot``."""
