"""The shared kernel: what every app uses, and nothing app-specific.

``live`` (after-commit websocket pushes), ``alerts`` (operator alerts and the webhook),
``tokens`` (token hashing and the verified-token cache), ``hearing`` and ``registry`` /
``control_plane`` (which control-plane processes are alive and hear agents), ``counters``
(durable metric counters), ``events`` (the signals by which a lower app tells a higher one
about a change) and the control-plane models. It imports no other app of the project.
"""
