"""pytest plugin: fixtures that start real Redis, ArcadeDB and scripted providers."""
