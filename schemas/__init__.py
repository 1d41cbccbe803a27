"""Models of every wire message and manifest kind, and the topic layout. No IO."""
