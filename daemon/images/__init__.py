"""OCI images: the store of blobs and unpacked layers, importing archives, pulling from
registries, and what a sandbox made from an image takes of it."""
