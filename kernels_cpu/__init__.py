"""CPU platform (x86-64, aarch64, ppc64le): paged attention in torch."""
