"""The NBD wire protocol: constants, a sans-IO server codec and a small client."""
