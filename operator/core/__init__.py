"""The pure core of the control plane: spec → (plan, desired child manifests, status). No I/O."""
