package service

import "os"

// growStdinFifo does nothing on macOS, whose FIFOs have a fixed size.
func growStdinFifo(*os.File) {}
