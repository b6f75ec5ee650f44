"""pytest plugin: fixtures that start real Redis, ArcadeDB and scripted providers.

Registered through the ``pytest11`` entry point, so every test in an environment with
``foredeck-kit[testing]`` can request these fixtures by name. Loading the plugin starts
nothing: each server starts the first time a test requests it. The fixtures live in the
modules listed below, which pytest loads as plugins of their own.
"""

pytest_plugins = [
    "foredeck_testing.stores",
    "foredeck_testing.provider.fixtures",
]
