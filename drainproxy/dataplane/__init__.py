"""Layer 4, dataplane: the client and upstream protocols (HTTP/1.1 framing, HTTP/2), the
listener's backlog and TLS. Imports config, system and core, never control."""
