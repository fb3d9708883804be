"""The PostgreSQL wire proxy: the protocol as pure functions (`protocol`)
and the server that routes, wakes and relays (`server`)."""
