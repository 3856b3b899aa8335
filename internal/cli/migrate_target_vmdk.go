package cli

// vmdkTargetKind is a vmdk image as a migration's target.
func vmdkTargetKind() targetKind {
	return notYetKind("vmdk", func(p string) bool { return hasExt(p, ".vmdk") },
		"VM disk targets of this format are not available yet: migrate into a raw image (.img) and convert it after the final pass ('sauve convert')")
}
