use outbox::transactional_event;

#[transactional_event(destination = "/queue/users", event_type = "user.created")]
struct UserCreated;

fn main() {}
