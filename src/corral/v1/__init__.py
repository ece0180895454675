"""Code generated from proto/corral/v1/*.proto by `make proto`. DO NOT EDIT."""
