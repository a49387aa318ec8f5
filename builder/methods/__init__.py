"""Build methods: each turns a recipe into a raw or qcow2 disk (see builder.build)."""
