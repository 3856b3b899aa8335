package blockmap

import "io"

func probeNTFS(r io.ReaderAt, size int64, warn func(string)) (*Filesystem, error)  { return nil, nil }
func probeFAT(r io.ReaderAt, size int64, warn func(string)) (*Filesystem, error)   { return nil, nil }
func probeSwap(r io.ReaderAt, size int64, warn func(string)) (*Filesystem, error)  { return nil, nil }
func probeOther(r io.ReaderAt, size int64, warn func(string)) (*Filesystem, error) { return nil, nil }
