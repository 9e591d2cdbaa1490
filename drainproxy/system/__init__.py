"""Layer 2, system: what drainproxy needs from the operating system and OpenSSL (TLS contexts
built from config and reloaded from disk, waiting on a process by pidfd). No HTTP."""
