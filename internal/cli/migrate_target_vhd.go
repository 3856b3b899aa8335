package cli

// vhdTargetKind is a vhd image as a migration's target.
func vhdTargetKind() targetKind {
	return notYetKind("vhd", func(p string) bool { return hasExt(p, ".vhd") },
		"VM disk targets of this format are not available yet: migrate into a raw image (.img) and convert it after the final pass ('sauve convert')")
}
