"""OCI images: the model, the content-addressed store, compression, layers, exports."""
