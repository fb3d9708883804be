"""The Strata service: its home directory, and the supervisor that runs the
page server and front-end processes (`python -m pageserver.service`)."""
