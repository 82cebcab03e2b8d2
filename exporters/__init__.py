"""Traffic exporters and observers beside the resolver; `exporters.sidecar` watches the wire for
attempts to get around it (see exporters/README.md)."""
