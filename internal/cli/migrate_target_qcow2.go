package cli

// qcow2TargetKind is a qcow2 image as a migration's target.
func qcow2TargetKind() targetKind {
	return notYetKind("qcow2", func(p string) bool { return hasExt(p, ".qcow2", ".qcow") },
		"VM disk targets of this format are not available yet: migrate into a raw image (.img) and convert it after the final pass ('sauve convert')")
}
