"""`python -m pageserver.service --home H`: the Strata service (see
`pageserver.service.daemon`)."""

from pageserver.service.daemon import main

main()
