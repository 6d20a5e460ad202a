package pc

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// ConsoleOption is the word of tamahv's command line that picks the
// serial port of its console: console=com1 (the default), com2, com3,
// com4, or a 16550's base port in hex (console=0x3e8).
const ConsoleOption = "console"

// The legacy serial ports' usual base ports.
const (
	COM1 = 0x3f8
	COM2 = 0x2f8
	COM3 = 0x3e8
	COM4 = 0x2e8
)

// ErrConsole is ConsolePort's error for a value it cannot use.
var ErrConsole = errors.New("pc: bad console")

// ConsolePort reads console= from tamahv's command line (the last one
// counts; COM1 where there is none): the base port of the UART tamahv
// writes its console to. A hex port must be 8-aligned (a 16550 has 8
// registers) and at or above 0x100, clear of the chipset's legacy ports.
func ConsolePort(cmdline string) (uint16, error) {
	port := uint16(COM1)
	for _, w := range strings.Fields(cmdline) {
		name, v, ok := strings.Cut(w, "=")
		if !ok || name != ConsoleOption {
			continue
		}
		switch strings.ToLower(v) {
		case "com1":
			port = COM1
		case "com2":
			port = COM2
		case "com3":
			port = COM3
		case "com4":
			port = COM4
		default:
			n, err := strconv.ParseUint(v, 0, 16)
			if err != nil || !strings.HasPrefix(v, "0x") || n < 0x100 || n%8 != 0 || n > 0xfff8 {
				return COM1, fmt.Errorf("%w: %s=%q: not com1-com4 or an 8-aligned hex port from 0x100 to 0xfff8", ErrConsole, name, v)
			}
			port = uint16(n)
		}
	}
	return port, nil
}

// SerialName is the name Linux gives the legacy serial port at base
// (ttyS0-ttyS3 for COM1-COM4), "" for another port.
func SerialName(base uint16) string {
	switch base {
	case COM1:
		return "ttyS0"
	case COM2:
		return "ttyS1"
	case COM3:
		return "ttyS2"
	case COM4:
		return "ttyS3"
	}
	return ""
}
