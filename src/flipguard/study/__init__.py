"""Application layer: everything that knows a run directory (create/open a run, build its
engine, and orchestrate campaigns, hardening, RA, validation, reports and studies on it).
Domain packages never import this package; the CLI is a thin layer over it."""
