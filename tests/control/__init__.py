"""Control-plane tests: QMP wrappers and orchestration against a fake QMP server."""
