package cli

// vhdxTargetKind is a vhdx image as a migration's target.
func vhdxTargetKind() targetKind {
	return notYetKind("vhdx", func(p string) bool { return hasExt(p, ".vhdx") },
		"VM disk targets of this format are not available yet: migrate into a raw image (.img) and convert it after the final pass ('sauve convert')")
}
