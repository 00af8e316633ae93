"""What tests/ and bench/ share: real servers on loopback (servers) and the device read-back counter (readbacks).
Nothing in training imports this package."""
