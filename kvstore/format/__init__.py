"""The objects on the store: the checksummed container, the manifest and the key scheme."""
