package s3

// ForceSigned makes b upload as it does for services that refuse CRC-32C
// checksums.
func (b *Backend) ForceSigned() { b.plainSigned.Store(true) }
