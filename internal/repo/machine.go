package repo

// Machine is what the machine whose disks a snapshot holds was, as far
// as the backup could see it: enough to define the virtual machine
// around the disks on export or migration. Every field may be empty.
type Machine struct {
	// Kind is "physical" (the machine sauve ran on) or "qemu" (a VM
	// backed up through its monitor).
	Kind      string `json:"kind"`
	CPUs      int    `json:"cpus,omitempty"`
	MemoryMiB int64  `json:"memory_mib,omitempty"`
	// Firmware is "bios" or "uefi".
	Firmware string `json:"firmware,omitempty"`
	// Controllers names the controller of each disk by the disk's name
	// in the snapshot: "ide", "sata", "scsi", "virtio", "nvme".
	Controllers map[string]string `json:"controllers,omitempty"`
	NICs        []NIC             `json:"nics,omitempty"`
}

// NIC is a network card: its MAC address and model (a driver or QEMU
// device name: "e1000", "virtio-net-pci", "igb").
type NIC struct {
	MAC   string `json:"mac"`
	Model string `json:"model,omitempty"`
}
