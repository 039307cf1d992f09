"""The runtime under the kernel backends: the FFI code-object launcher, the
on-disk code cache and the external toolchain."""
