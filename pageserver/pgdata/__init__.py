"""A PostgreSQL data directory kept in a timeline: the file tree in keys
(`layout`), POSIX operations over it (`datadir`), import and export
(`importer`), and which files stay with the compute (`policy`)."""
