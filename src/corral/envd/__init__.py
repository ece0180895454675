"""Code generated from proto/corral/envd/*.proto by `make proto`. DO NOT EDIT."""
