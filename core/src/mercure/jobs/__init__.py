"""The durable job store: spool folders, task files and claims."""
