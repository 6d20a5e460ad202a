package swapmem

// link is the pair of pointers an element keeps for one intrusive list.
type link[T any] struct {
	prev, next *T
	in         *ilist[T]
}

// ilist is an intrusive doubly linked list: the elements carry their own
// links, so adding and removing never allocates. at returns the link of an
// element that belongs to this kind of list.
type ilist[T any] struct {
	head, tail *T
	n          int
	at         func(*T) *link[T]
}

func (l *ilist[T]) pushBack(x *T) {
	lx := l.at(x)
	lx.prev, lx.next, lx.in = l.tail, nil, l
	if l.tail != nil {
		l.at(l.tail).next = x
	} else {
		l.head = x
	}
	l.tail = x
	l.n++
}

func (l *ilist[T]) pushFront(x *T) {
	lx := l.at(x)
	lx.prev, lx.next, lx.in = nil, l.head, l
	if l.head != nil {
		l.at(l.head).prev = x
	} else {
		l.tail = x
	}
	l.head = x
	l.n++
}

// remove unlinks x; it does nothing if x is not in l.
func (l *ilist[T]) remove(x *T) {
	lx := l.at(x)
	if lx.in != l {
		return
	}
	if lx.prev != nil {
		l.at(lx.prev).next = lx.next
	} else {
		l.head = lx.next
	}
	if lx.next != nil {
		l.at(lx.next).prev = lx.prev
	} else {
		l.tail = lx.prev
	}
	lx.prev, lx.next, lx.in = nil, nil, nil
	l.n--
}

func (l *ilist[T]) contains(x *T) bool { return l.at(x).in == l }

func (l *ilist[T]) next(x *T) *T { return l.at(x).next }
