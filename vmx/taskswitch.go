package vmx

// TaskSwitch is the exit qualification of a task switch (SDM Vol. 3C,
// "Exit Qualification for Task Switches").
type TaskSwitch struct {
	Selector uint16 // the new TSS's selector
	Source   TaskSwitchSource
}

// TaskSwitchSource is what started a task switch.
type TaskSwitchSource uint8

// Task-switch sources.
const (
	TaskSwitchCALL TaskSwitchSource = 0
	TaskSwitchIRET TaskSwitchSource = 1
	TaskSwitchJMP  TaskSwitchSource = 2
	TaskSwitchGate TaskSwitchSource = 3 // a task gate in the IDT
)

func (s TaskSwitchSource) String() string {
	switch s {
	case TaskSwitchCALL:
		return "CALL"
	case TaskSwitchIRET:
		return "IRET"
	case TaskSwitchJMP:
		return "JMP"
	}
	return "task gate in the IDT"
}

// DecodeTaskSwitch splits a task-switch exit qualification.
func DecodeTaskSwitch(q uint64) TaskSwitch {
	return TaskSwitch{Selector: uint16(q), Source: TaskSwitchSource(q >> 30 & 3)}
}

// Activity states (SDM Vol. 3C, "Guest Non-Register State").
const (
	ActivityActive      = 0
	ActivityHLT         = 1
	ActivityShutdown    = 2
	ActivityWaitForSIPI = 3
)
