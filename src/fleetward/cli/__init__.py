"""The ``fleetward`` command line: thin over the admin API."""
