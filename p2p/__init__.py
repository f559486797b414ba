"""Everything that knows about peers (libp2p host, wire format, protocols, routing)."""
