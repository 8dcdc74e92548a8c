"""The native API's routes, one module per resource (the seed's `/train`, `/status`, `/merge`; `/jobs`, health,
artifacts, the dashboard), wired in `api.main`."""
