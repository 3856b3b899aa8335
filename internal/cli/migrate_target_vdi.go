package cli

// vdiTargetKind is a vdi image as a migration's target.
func vdiTargetKind() targetKind {
	return notYetKind("vdi", func(p string) bool { return hasExt(p, ".vdi") },
		"VM disk targets of this format are not available yet: migrate into a raw image (.img) and convert it after the final pass ('sauve convert')")
}
