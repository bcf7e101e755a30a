// A JMS consumer on ActiveMQ's own client: reads a queue with a selector and
// prints "<JMSType> <event-id>" per message until none comes for a while.
// Arguments: broker URI, queue name, selector, idle milliseconds.
import javax.jms.Connection;
import javax.jms.Message;
import javax.jms.MessageConsumer;
import javax.jms.Session;
import org.apache.activemq.ActiveMQConnectionFactory;

public class JmsSelect {
    public static void main(String[] args) throws Exception {
        Connection connection = new ActiveMQConnectionFactory(args[0]).createConnection();
        connection.start();
        Session session = connection.createSession(false, Session.AUTO_ACKNOWLEDGE);
        MessageConsumer consumer = session.createConsumer(session.createQueue(args[1]), args[2]);
        long idle = Long.parseLong(args[3]);
        Message message;
        while ((message = consumer.receive(idle)) != null) {
            System.out.println(message.getJMSType() + " " + message.getStringProperty("event-id"));
        }
        connection.close();
    }
}
